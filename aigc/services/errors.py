"""The one error the services raise (re-exported by ``aigc.services``)."""


class ServiceError(RuntimeError):
    """A service could not start; the message says which, and where its log is."""
