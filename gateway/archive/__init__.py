"""The audit archive (docs/contract.md §13): every decision and change, kept for years, tamper-evident.

``segments`` holds the on-disk layout and the hash chain, ``archiver`` moves records from Redis
into it exactly once, ``columns`` keeps a Parquet query index beside each segment, ``verify``
checks a whole archive, ``query`` answers questions from it with DuckDB, ``commands`` adds the
``gateway audit archive|verify|query|report`` subcommands.
"""
