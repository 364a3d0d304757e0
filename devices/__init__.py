"""Devices (TOML); installed as the evit_deploy.device_files package data."""
