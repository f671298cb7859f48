from django.urls import path

from . import views

app_name = "analytics"

urlpatterns = [
    path("dashboard/", views.dashboard, name="dashboard"),
    path("dashboard/requests/", views.requests_page, name="requests"),
    path("dashboard/requests/<str:request_id>/", views.request_page, name="request"),
    path("dashboard/batches/", views.batches, name="batches"),
    path("dashboard/recommendations/", views.recommendations_page, name="recommendations"),
    path("dashboard/versions/", views.versions, name="versions"),
    path("dashboard/usage.csv", views.usage_csv, name="usage_csv"),
    path("dashboard/usage-summary.csv", views.usage_summary_csv, name="usage_summary_csv"),
]
