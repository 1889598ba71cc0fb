"""Deployment: certificates and keys (:mod:`.certs`), process supervision (:mod:`.processes`), the
Flower SuperLink/SuperNode wrappers (:mod:`.flower`) and the one-machine trial (:mod:`.local`)."""
