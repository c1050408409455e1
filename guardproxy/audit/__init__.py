"""The audit trail: one JSON line per guarded request (see ``settings`` and ``writer``)."""
