"""Reading captioning datasets: the folder layouts people have (one reader each), webdataset and parquet shards,
stored images, the checks that run before training, and the torch datasets that training and evaluation read."""
