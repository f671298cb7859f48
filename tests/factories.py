"""Factories for every model. Personas: an owner, a teammate and an outsider come from these."""

from datetime import timedelta
from decimal import Decimal

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from apps.analytics.models import UsageEvent
from apps.billing.models import Alert, Budget, Price
from apps.gateway.models import Deployment, ModelAlias, Provider, RateLimit
from apps.keys import crypto
from apps.keys.models import ApiKey, AuditLog, Membership, ProviderCredential, Source, Tenant


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.test")
    is_staff = True
    password = factory.PostGenerationMethodCall("set_password", "pw-12345678")


class TenantFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Tenant
        django_get_or_create = ("slug",)

    slug = factory.Sequence(lambda n: f"tenant{n}")
    name = factory.LazyAttribute(lambda o: o.slug.title())
    timezone = "UTC"


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    user = factory.SubFactory(UserFactory)
    tenant = factory.SubFactory(TenantFactory)
    role = "manager"


class SourceFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Source

    tenant = factory.SubFactory(TenantFactory)
    name = factory.Sequence(lambda n: f"app{n}")
    type = "application"


class ApiKeyFactory(factory.django.DjangoModelFactory):
    """`ApiKeyFactory()` gives a key whose secret is on `key.secret` (never stored)."""

    class Meta:
        model = ApiKey

    tenant = factory.SubFactory(TenantFactory)
    source = factory.SubFactory(SourceFactory, tenant=factory.SelfAttribute("..tenant"))
    name = factory.Sequence(lambda n: f"key{n}")
    secret = factory.LazyFunction(crypto.api_key_generate)
    digest = factory.LazyAttribute(lambda o: crypto.api_key_digest(o.secret))
    prefix = factory.LazyAttribute(lambda o: crypto.api_key_display_prefix(o.secret))

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        secret = kwargs.pop("secret", None)
        obj = super()._create(model_class, *args, **kwargs)
        obj.secret = secret
        return obj


class ProviderCredentialFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ProviderCredential

    name = factory.Sequence(lambda n: f"cred{n}")
    encrypted_secret = factory.LazyFunction(lambda: crypto.encrypt("upstream-secret-xyz"))


class ProviderFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Provider

    name = factory.Sequence(lambda n: f"provider{n}")
    kind = "mock"
    api_base = ""


class ModelAliasFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ModelAlias

    alias = factory.Sequence(lambda n: f"model-{n}")


class DeploymentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Deployment

    alias = factory.SubFactory(ModelAliasFactory)
    provider = factory.SubFactory(ProviderFactory)
    upstream_model = factory.LazyAttribute(lambda o: f"up-{o.alias.alias}")
    weight = 1
    priority = 0


class PriceFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Price

    model = factory.Sequence(lambda n: f"model-{n}")
    input_usd_per_mtok = Decimal("1.00")
    output_usd_per_mtok = Decimal("2.00")
    effective_from = factory.LazyFunction(lambda: timezone.now() - timedelta(days=1))


class BudgetFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Budget

    tenant = factory.SubFactory(TenantFactory)
    name = factory.Sequence(lambda n: f"budget{n}")
    scope = "tenant"
    limit_usd = Decimal("10")
    period = "monthly"
    enforcement = "hard"


class RateLimitFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = RateLimit

    tenant = factory.SubFactory(TenantFactory)
    scope = "tenant"
    rpm = 60


class UsageEventFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = UsageEvent

    request_id = factory.Sequence(lambda n: f"req_test{n:08d}")
    timestamp = factory.LazyFunction(timezone.now)
    tenant = factory.SubFactory(TenantFactory)
    source_type = "application"
    source_ref = "app"
    model = "gpt-4o-mini"
    prompt_tokens = 10
    completion_tokens = 20
    cost = Decimal("0.0000135")
    status = 200


class AuditLogFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = AuditLog

    actor = "cli"
    action = "create"
    object_type = "apikey"


class AlertFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Alert

    budget = factory.SubFactory(BudgetFactory)
    tenant = factory.SelfAttribute("budget.tenant")
    kind = "threshold"
    threshold = Decimal("0.8")
    period_start = factory.LazyFunction(lambda: timezone.now().replace(day=1, hour=0, minute=0, second=0,
                                                                       microsecond=0))
    message = "Budget reached 80% of its limit."
