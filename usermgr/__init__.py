"""usermgr: the admin tool for the users table of a Python web app."""

__version__ = "0.2.0"
