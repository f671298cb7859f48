# One image for every role of the production profile: gateway (gunicorn + uvicorn workers),
# Celery workers, beat and the one-shot `migrate`. See docker-compose.yml and deploy/k8s/.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DJANGO_PROFILE=production
WORKDIR /app
COPY pyproject.toml README.md ./
COPY . .
RUN pip install . \
    && useradd --system --uid 10001 --home /app llms \
    && mkdir -p /app/var && chown -R llms /app/var
# collectstatic needs settings only, not the database: a throwaway key is enough at build time.
RUN SECRET_KEY=build-only ALLOWED_HOSTS=localhost python manage.py collectstatic --noinput -v0
USER llms
EXPOSE 8000
CMD ["gunicorn", "config.asgi:application", "-k", "uvicorn_worker.UvicornWorker", "-w", "2", "-b", "0.0.0.0:8000"]
