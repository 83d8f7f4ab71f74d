"""Lets ``twistd csms`` find the Central System (the service maker imports lazily)."""
from twisted.application.service import ServiceMaker

csms = ServiceMaker(
    "OCPP 1.6J Central System",
    "csms.service",
    "An OCPP 1.6J Central System (CSMS) with feature-profile plugins.",
    "csms",
)
