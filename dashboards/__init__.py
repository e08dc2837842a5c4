"""The operator dashboard (Bokeh server application)."""
