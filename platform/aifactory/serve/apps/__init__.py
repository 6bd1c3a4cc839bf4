"""Ray Serve applications of the factory (imported explicitly; they import Ray Serve and FastAPI).

``serve_apps/<app>.py`` re-exports each ``app_builder`` so that ``serve run serve_apps.<app>:app_builder``
works from the repository; declarative deploys (``factory serve deploy``) use the import paths here, which
resolve wherever aifactory is installed.
"""
