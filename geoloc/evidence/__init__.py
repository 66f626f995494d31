"""Evidence the model can state about a photo, with labels every geotagged photo gets from its coordinates."""
