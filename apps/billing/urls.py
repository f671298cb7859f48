from django.urls import path

from . import views

app_name = "billing"

urlpatterns = [
    path("dashboard/budgets/<int:budget_pk>/", views.budget_detail, name="budget_detail"),
]
