"""Kling MCP Gateway: a hosted, multi-tenant MCP and REST gateway for Kling AI image generation."""

__version__ = "0.1.0"
