"""An event-sourced order service, its CQRS view and the seed's orchestrated saga.

* :mod:`.domain` - the Order aggregate (a plain class with typed apply methods)
  and its snapshot codec.
* :mod:`.view` - the denormalized order view projection (order, items, payment
  and shipment status).
* :mod:`.saga` - the seed's §8.4 state machine as a declarative orchestrated saga,
  with command participants for order, inventory, payment, shipping, notification.
* ``python -m examples.es_orders`` runs all of it against an embedded nats-server.
"""
