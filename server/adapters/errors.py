"""Errors raised while reading or validating adapters. Each message names the problem for the user."""


class AdapterError(ValueError):
    """An adapter cannot be used; the message says why, in words a user can act on."""


class AdapterFormatError(AdapterError):
    """The adapter folder or its files are not a PEFT LoRA save we accept (pickle files, missing/extra tensors...)."""


class UnsupportedAdapterError(AdapterError):
    """The adapter uses a PEFT feature this server does not serve (DoRA, bias, modules_to_save...)."""


class AdapterMismatchError(AdapterError):
    """The adapter does not fit the loaded base model (shapes, target modules) or the server's limits (rank)."""

