"""The security plugin's tables (all prefixed ``security_``)."""
from sqlalchemy import MetaData

metadata = MetaData()
