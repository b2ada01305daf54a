"""Queue backends behind one interface (:class:`~ingate.asyncproc.backends.base.QueueBackend`)."""
