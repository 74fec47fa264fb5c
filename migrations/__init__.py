"""Plain numbered SQL migrations (``NNN_name.sql``), applied in order by ``worker.migrate``.

This file only makes the folder installable, so the SQL ships inside the wheel.
"""
