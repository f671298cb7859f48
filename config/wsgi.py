import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = get_wsgi_application()

from apps.analytics.journal import replay_in_background  # noqa: E402 - after setup

replay_in_background("web start-up")  # ledger rows journaled while the database was down
