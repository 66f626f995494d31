"""Neural networks: the image encoder, the GPS (location) encoder and the geolocator that joins them."""
