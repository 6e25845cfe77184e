"""The denormalized order view; it lives in :mod:`examples.shop.view` (one definition for both examples)."""

from examples.shop.view import COLLECTION, HANDLERS, OrderView

__all__ = ["COLLECTION", "HANDLERS", "OrderView"]
