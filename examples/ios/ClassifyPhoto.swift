// Classify a photo with the EfficientViT-M2 package that `evit-deploy export m2 --target coreml`
// (or `evit-deploy build`) made. Add EfficientViT-M2.mlpackage to the Xcode project: Xcode
// generates the `EfficientViT_M2` class. The package takes the RGB image as is (the ImageNet
// normalisation is inside the model) and returns `classLabel` and `classLabelProbs`.
import CoreML
import Vision

func classify(_ image: CGImage, completion: @escaping ([(label: String, confidence: Float)]) -> Void) throws {
    let configuration = MLModelConfiguration()
    configuration.computeUnits = .cpuAndNeuralEngine           // what the iphone11-a13 device targets
    let model = try VNCoreMLModel(for: EfficientViT_M2(configuration: configuration).model)

    let request = VNCoreMLRequest(model: model) { request, _ in
        let results = (request.results as? [VNClassificationObservation]) ?? []
        completion(results.prefix(5).map { ($0.identifier, $0.confidence) })
    }
    // The model was trained on a centre crop of the short side (resize 256, crop 224).
    request.imageCropAndScaleOption = .centerCrop
    try VNImageRequestHandler(cgImage: image).perform([request])
}

// Without Vision: the generated class takes a 224x224 CVPixelBuffer directly.
func topLabel(_ pixelBuffer: CVPixelBuffer) throws -> String {
    let output = try EfficientViT_M2().prediction(image: pixelBuffer)
    return output.classLabel    // output.classLabelProbs: [String: Double] for all 1000 classes
}
