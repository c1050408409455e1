"""The request side: one reading of the client's request that every guard and the
forwarded body share (path, JSON body, the dialect's request plan)."""
