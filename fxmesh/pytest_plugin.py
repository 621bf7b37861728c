"""pytest plugin: ``pytest --fxmesh-compile`` runs every optimizer step through fxmesh."""
