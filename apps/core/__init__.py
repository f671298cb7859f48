"""Runtime plumbing every app may use, and which uses none of ours: the sync-to-async bridge and
database pool (`db`), the one Redis client with its timeout policy (`redis`), process caches and
their reset (`caches`), and money formatting (`money`)."""
