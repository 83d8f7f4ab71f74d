"""An OCPP 1.6J Central System built on Twisted, Autobahn, pluggy and SQLAlchemy."""

__version__ = "0.1.0"
