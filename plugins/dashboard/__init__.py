"""The operator web dashboard under /ui/ on the operator API's site, built on the API's own routes."""
from .plugin import DashboardPlugin

plugin = DashboardPlugin
