"""Pure decisions, importable and testable without any I/O: routing
(``router``, ``userregex``), rate-limit math (``ratelimit``), the circuit
breaker's state machine (``breaker``) and the retry policy
(``retry_policy``). Each is a function of its inputs and ``now``."""
