"""Request field types shared by the API's routes."""

from typing import Annotated, Any

from pydantic import BeforeValidator


def _integral(value: Any) -> Any:
    """JSON Schema's ``integer`` includes ``3.0``: take an integral float as the int it is (strict
    validation still refuses ``3.5``, ``"3"`` and ``true``)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


JsonInt = Annotated[int, BeforeValidator(_integral)]
