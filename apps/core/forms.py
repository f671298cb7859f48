"""Form fields and widgets the admin uses instead of raw JSON boxes (plumbing: no app of ours here)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import validate_email


class MoneyInput(forms.NumberInput):
    """A Decimal without the database's trailing zeros (50, not 50.0000000000), any step."""

    def __init__(self, attrs=None):
        super().__init__({"step": "any", "min": "0", **(attrs or {})})

    def format_value(self, value):
        if isinstance(value, str):
            try:
                value = Decimal(value)
            except InvalidOperation:
                return value
        if isinstance(value, Decimal):
            return format(value.normalize(), "f")
        return super().format_value(value)


class PercentListField(forms.CharField):
    """A list of fractions (0.5, 0.8, 1.0) edited as percentages: "50, 80, 100"."""

    def __init__(self, *, max_percent: int = 1000, **kwargs):
        self.max_percent = max_percent
        kwargs.setdefault("widget", forms.TextInput(attrs={"placeholder": "e.g. 50, 80, 100", "size": 30}))
        super().__init__(**kwargs)

    def prepare_value(self, value):
        if isinstance(value, list | tuple):
            return ", ".join(format((Decimal(str(v)) * 100).normalize(), "f") for v in value)
        return value

    def to_python(self, value):
        if isinstance(value, list | tuple):
            return list(value)
        text = super().to_python(value) or ""
        out = []
        for part in text.replace(";", ",").replace("%", "").split(","):
            part = part.strip()
            if not part:
                continue
            try:
                percent = Decimal(part)
            except InvalidOperation:
                raise ValidationError(f"{part!r} is not a number: give percentages, e.g. 50, 80, 100.") from None
            if not 0 < percent <= self.max_percent:
                raise ValidationError(f"{part}% is out of range (above 0, at most {self.max_percent}).")
            out.append(_fraction(percent))
        return sorted(set(out))


def _fraction(percent: Decimal):
    """50 -> 0.5 as a JSON number (stored in a JSONField: a float with the exact short repr)."""
    return float(percent / 100)


class EmailListField(forms.CharField):
    """A list of e-mail addresses, one a line (commas accepted too)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("widget", forms.Textarea(attrs={"rows": 3, "cols": 40,
                                                          "placeholder": "one address a line"}))
        super().__init__(**kwargs)

    def prepare_value(self, value):
        if isinstance(value, list | tuple):
            return "\n".join(value)
        return value

    def to_python(self, value):
        if isinstance(value, list | tuple):
            return list(value)
        text = super().to_python(value) or ""
        emails = [e.strip() for e in text.replace(",", "\n").replace(";", "\n").splitlines() if e.strip()]
        for e in emails:
            try:
                validate_email(e)
            except ValidationError:
                raise ValidationError(f"{e!r} is not an e-mail address.") from None
        return list(dict.fromkeys(emails))


class TenantDefaultBooleanSelect(forms.NullBooleanSelect):
    """Yes / No / empty, where empty means "the tenant's default" (not "Unknown")."""

    def __init__(self, attrs=None, *, default_label: str = "Tenant default"):
        super().__init__(attrs)
        self.choices = [("unknown", default_label), ("true", "On"), ("false", "Off")]
