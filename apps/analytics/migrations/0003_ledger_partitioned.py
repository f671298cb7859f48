"""PostgreSQL: the ledger becomes range-partitioned by month, idempotent on request_id through the
UsageEventRequest table (apps/analytics/partitions.py). Every row and id of the old table is kept.
SQLite: only the (unused) UsageEventRequest table is created."""

from django.db import migrations, models


def forward(apps, schema_editor):
    from apps.analytics import partitions

    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cur:  # the primary key is all the table needs
        cur.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s AND indexdef LIKE %s",
                    [partitions.IDEMPOTENCY_TABLE, "%varchar_pattern_ops%"])
        for (name,) in cur.fetchall():
            cur.execute(f'DROP INDEX "{name}"')
    partitions.convert_to_partitioned(schema_editor)
    partitions.partitions_ensure(conn=schema_editor.connection)


def backward(apps, schema_editor):
    from apps.analytics import partitions

    partitions.convert_to_unpartitioned(schema_editor)


class Migration(migrations.Migration):

    dependencies = [
        ('analytics', '0002_usage_rollups'),
        ('billing', '0001_initial'),
        ('gateway', '0001_initial'),
        ('keys', '0001_initial'),
    ]

    operations = [
        migrations.CreateModel(
            name='UsageEventRequest',
            fields=[
                ('request_id', models.CharField(max_length=64, primary_key=True, serialize=False)),
                ('timestamp', models.DateTimeField()),
            ],
        ),
        migrations.RunPython(forward, backward),
    ]
