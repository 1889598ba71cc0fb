"""The Flower 1.42 transport of a deployed task: ServerApp (the coordinator's loop), ClientApp (the
node's relay to its fedmdh node service) and the conversion between Flower records and the
protocol's ``(meta, arrays)`` messages. Transport lives here and nowhere else.

Nothing is imported here: the ClientApp's process starts for every message, so what it imports
must stay light (:mod:`.client_app` imports flwr, numpy and the standard library only).
"""
