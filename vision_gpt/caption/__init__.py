"""The batch caption job (`vision-gpt caption`): its inputs, the DataLoader workers that read images, the output
files and their lock, and the Ray engine."""
