"""The audit trail: one JSON line per guarded request (``line``: the format; ``settings``:
the policy's ``audit:``; ``writer``: the queue, thread and rotation; ``trail``: the
observer; ``verify``: the hash chain across rotated files)."""
