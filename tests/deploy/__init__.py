"""Tests of deploy/, the Dockerfile and docker-compose.yml, without Docker or a cluster."""
