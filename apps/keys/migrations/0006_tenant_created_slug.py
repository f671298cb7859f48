from django.db import migrations, models
from django.db.models import F


def backfill(apps, schema_editor):
    apps.get_model("keys", "Tenant").objects.filter(created_slug="").update(created_slug=F("slug"))


class Migration(migrations.Migration):

    dependencies = [
        ("keys", "0005_sso_identity"),
    ]

    operations = [
        migrations.AddField(
            model_name="tenant",
            name="created_slug",
            field=models.SlugField(default="", editable=False),
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]
