"""The export-control policy, pure (no aiohttp, no Redis, no clock).

``names`` holds the vocabulary (list names, decision codes, stages), ``model`` the snapshot types
and the caller, ``validate`` operator-input validation and write warnings, ``wire`` the stored
form and ``build_snapshot``, ``decide`` the decision and its messages.
"""
