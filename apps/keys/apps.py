from django.apps import AppConfig


class KeysConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "apps.keys"
    label = "keys"

    def ready(self):
        from . import logins  # noqa: F401 - connects the login lockout audit
