"""Settings of the test suite (pytest's DJANGO_SETTINGS_MODULE): the embedded defaults, with the
published demo SECRET_KEY asked for explicitly (LLMS_DEMO=1). The flag is put in the environment, so
the gateway, worker and manage.py processes that tests start inherit it."""

import os

os.environ.setdefault("LLMS_DEMO", "1")

from config.settings import *  # noqa: E402, F403
