"""Key management, the control plane's domain: keys and their lifecycle
(``keys``, ``keychain``, ``keyrules``, ``keyformat``), admins, roles and
the audit log (``admins``, ``permissions``, ``audit``), secrets
(``crypto``, ``datadir``), and the shared vocabulary of ids, paging,
times and request/response models."""
