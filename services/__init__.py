"""The pasta order: example microservices that take part in one saga.

Each service is a separate process serving its own command topic through a `saga.Participant`
and keeping its own state in an SQLite file (``<SAGA_SERVICES_DATA or ./var>/<service>.sqlite3``),
the same file its reply store uses:

- `services.location`: reserves a delivery slot in the customer's zone;
- `services.payment`: charges and refunds the customer;
- `services.restaurant`: accepts an order, prepares and discards its dishes one by one,
  starts cooking it (the pivot; a whole catering at once), cancels it;
- `services.rider`: assigns and releases a rider;
- `services.notification`: tells the customer the order is on its way.

`services.app` declares the sagas (the pasta order, and a party's catering of such orders),
`services.orders` makes and submits orders, `services.faults` injects failures on request,
`services.fleet` runs the coordinator and the services as processes, and `services.demo` puts
it all together (``make demo``).
"""
