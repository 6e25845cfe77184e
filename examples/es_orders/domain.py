"""The Order aggregate; it lives in :mod:`examples.shop.domain` (one definition for both examples)."""

from examples.shop.domain import AGGREGATE, ORDER_CODEC, Order, OrderRejected

__all__ = ["AGGREGATE", "ORDER_CODEC", "Order", "OrderRejected"]
