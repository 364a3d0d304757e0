"""Device profiles (TOML); installed as the evit_deploy.target_profiles package data."""
