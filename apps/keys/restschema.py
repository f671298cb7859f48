"""The OpenAPI schema class of the management API: every operation documents its error responses
(the shape is described in `restapi.py`)."""

from __future__ import annotations

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers

# --- schema ----------------------------------------------------------------------------------

class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()


class ConflictSerializer(serializers.Serializer):
    detail = serializers.CharField()
    blocked_by = serializers.DictField(child=serializers.IntegerField(), required=False,
                                       help_text="{model name: number of rows} that block a delete")


class ValidationErrorSerializer(serializers.Serializer):
    """`{"<field>": ["message", ...]}` per invalid field (`non_field_errors` for the whole object),
    or `{"detail": "..."}` (e.g. control characters in the request)."""

    def to_representation(self, instance):  # pragma: no cover - schema only
        return instance


_VALIDATION_SCHEMA = {
    "type": "object",
    "description": ValidationErrorSerializer.__doc__,
    "additionalProperties": {},
}


class ApiAutoSchema(AutoSchema):
    """drf-spectacular's AutoSchema, with the error responses every /api/ operation can give:
    400 (invalid input or parameters, control characters), 401/403 (not signed in, role), 404
    (detail routes: not found or another tenant's), 409 (deletes blocked by protected rows)."""

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        errors = {
            "400": OpenApiResponse(response=_VALIDATION_SCHEMA, description="Invalid input"),
            "401": OpenApiResponse(response=ErrorSerializer, description="Not signed in"),
            "403": OpenApiResponse(response=ErrorSerializer, description="Not allowed for this user"),
        }
        if self._is_detail_route():
            errors["404"] = OpenApiResponse(response=ErrorSerializer, description="Not found (or another tenant's)")
        if self.method == "DELETE":
            errors["409"] = OpenApiResponse(response=ConflictSerializer,
                                            description="Still referred to by other rows (see blocked_by)")
        for code, response in errors.items():
            if code not in responses:
                responses[code] = self._get_response_for_code(response, code, direction=direction)
        return responses

    def _is_detail_route(self) -> bool:
        return "{" in self.path
