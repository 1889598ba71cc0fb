"""Confidential aggregation in software: threshold CKKS (OpenFHE) for the summable payloads.

- :mod:`fedmdh.secure.threshold`: joint keys, encryption, deterministic homomorphic sums, joint
  decryption (:class:`~fedmdh.secure.threshold.ThresholdGroup` for the in-process runtime).
- :mod:`fedmdh.secure.aggregation`: a round's aggregate through a secure sum, for the algorithms that
  declare a rule from sums (``Algorithm.secure_reveals is None``); the refusal message for the others.
- :mod:`fedmdh.secure.backend`: where OpenFHE runs (this interpreter, or ``$FEDMDH_OPENFHE_PYTHON``).

See ``docs/security.md`` for the threat model and what is and is not covered.
"""
