"""The "Regression Task" service behind ``fedmdh serve``: a REST API and a page over the library.

- :mod:`fedmdh.service.app`: the FastAPI app (``create_app``): error handlers, body limits, the routers;
- :mod:`fedmdh.service.routes`: the endpoints and pages, one module per resource (pages, tasks, ledger,
  models); :mod:`fedmdh.service.context`: the state they share, through a dependency;
- :mod:`fedmdh.service.store`: the SQLite task store in the service's folder;
- :mod:`fedmdh.service.submission`: uploads and the validation of a request (the CLI's checks);
- :mod:`fedmdh.service.runner`: the worker that runs queued tasks and publishes their progress;
- :mod:`fedmdh.service.runtime`: the :class:`~fedmdh.service.runtime.TaskRuntime` seam and the simulator;
- :mod:`fedmdh.service.auth`: the token.

See docs/service.md.
"""
