"""Explain: the operator's dry run of one request against the policy in force.

    report = await explain(pipeline, ExplainRequest.from_json(doc, pipeline.dialect),
                           account="alice", ip="203.0.113.9", linkage=store)
    # guardproxy.explain.engine.explain; ``guardproxy explain`` and /admin/explain call it

Nothing is forwarded and nothing is counted: every rule kind's guard has an
``explain(exchange)`` method that reads what ``check`` would write (quota windows with
the ``limits`` library's ``get_window_stats``, budgets with ``BudgetStore.usage``, the
linked cluster with ``LinkageStore.cluster``) and applies the body changes ``check``
would make (the output cap a budget writes) to the request's own copy. This package's
``__init__`` imports nothing of the pipeline, so that the guards can import
``guardproxy.explain.verdict``; the engine lives in ``guardproxy.explain.engine``.
"""

from guardproxy.explain.verdict import ALLOW, DENY, NONE, RuleExplanation

__all__ = ["ALLOW", "DENY", "NONE", "RuleExplanation"]
