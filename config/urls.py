from django.conf import settings
from django.contrib import admin
from django.urls import include, path, re_path

from apps.analytics import views as analytics_views
from apps.gateway.api import api as data_plane
from apps.keys import sso

admin.site.site_header = "LLM Service administration"
admin.site.site_title = "LLM Service"
admin.site.index_title = "Administration"
admin.site.site_url = "/"  # "View site": the front page sends people to the dashboard or the login

urlpatterns = [
    path("", analytics_views.home, name="home"),
    path("v1/", data_plane.urls),
    path("admin/login/", sso.admin_login),
    path("admin/", admin.site.urls),
    path("accounts/login/", sso.LoginView.as_view(), name="login"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("oidc/authenticate/", sso.SsoAuthenticateView.as_view(), name="sso_authenticate"),
    path("oidc/callback/", sso.SsoCallbackView.as_view(), name="sso_callback"),
    path("healthz", analytics_views.healthz, name="healthz"),
    path("readyz", analytics_views.readyz, name="readyz"),
    path("", include("apps.analytics.urls")),
    path("", include("apps.billing.urls")),
    path("api/", include("config.api_urls")),
    path("metrics", analytics_views.metrics, name="metrics"),
]
if settings.SERVE_STATIC:
    urlpatterns.append(re_path(r"^static/(?P<path>.*)$", analytics_views.static_file))
