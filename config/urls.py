from django.contrib import admin
from django.urls import include, path

from apps.analytics import views as analytics_views
from apps.gateway.api import api as data_plane

urlpatterns = [
    path("v1/", data_plane.urls),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("healthz", analytics_views.healthz, name="healthz"),
    path("readyz", analytics_views.readyz, name="readyz"),
]
