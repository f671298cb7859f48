"""Celery tasks of the data plane."""

from celery import shared_task

from .services import deployments_probe as _deployments_probe


@shared_task(name="gateway.deployments_probe", ignore_result=True)
def deployments_probe() -> int:
    """Beat: probe every active deployment, recording availability and latency (DeploymentHealth)."""
    return len(_deployments_probe())
