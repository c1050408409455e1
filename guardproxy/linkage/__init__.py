"""Account linkage: which accounts act as one actor (see ``api``)."""
