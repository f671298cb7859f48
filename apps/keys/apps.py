from django.apps import AppConfig


class KeysConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "apps.keys"
    label = "keys"

    def ready(self):
        from . import api_tokens, logins  # noqa: F401 - the login lockout audit; the token schema extension
