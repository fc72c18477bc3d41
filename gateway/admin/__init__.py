"""The admin listener's operator side: token auth, the ``/admin/v1`` API and its OpenAPI document,
and the ``gateway`` CLI's operator subcommands that call it."""
